"""One module per group of ``edgeship`` commands; loaded lazily by ``edgeship.toolkit.cli``."""
