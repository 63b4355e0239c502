"""Re-runnable experiments: gate search against every selection baseline on one teacher (`selection`), with plots."""
