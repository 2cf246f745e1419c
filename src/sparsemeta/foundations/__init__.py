"""Layer 0: what every other layer may use — user errors, atomic files, named random streams."""
