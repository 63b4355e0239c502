"""`python tools/make_slurm.py ...` runs flashmorph.cli.make_slurm;
installed, the same command is `flashmorph-make-slurm`."""

from flashmorph.cli.make_slurm import main

if __name__ == "__main__":
    raise SystemExit(main())
