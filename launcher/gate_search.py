"""`python launcher/gate_search.py ...` (or under deepspeed) runs flashmorph.cli.gate_search;
installed, the same command is `flashmorph-gate-search`."""

from flashmorph.cli.gate_search import main

if __name__ == "__main__":
    raise SystemExit(main())
