"""`python launcher/teacher.py ...` (or under deepspeed) runs flashmorph.cli.teacher;
installed, the same command is `flashmorph-teacher`."""

from flashmorph.cli.teacher import main

if __name__ == "__main__":
    raise SystemExit(main())
