"""The CI runner: workflows in fresh microVMs."""
