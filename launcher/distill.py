"""`python launcher/distill.py ...` (or under deepspeed) runs flashmorph.cli.distill;
installed, the same command is `flashmorph-distill`."""

from flashmorph.cli.distill import main

if __name__ == "__main__":
    raise SystemExit(main())
