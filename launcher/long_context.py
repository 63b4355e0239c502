"""`python launcher/long_context.py ...` (or under deepspeed) runs flashmorph.cli.long_context;
installed, the same command is `flashmorph-long-context`."""

from flashmorph.cli.long_context import main

if __name__ == "__main__":
    raise SystemExit(main())
