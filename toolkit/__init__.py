"""edgeship.toolkit: the host CLI (``edgeship``) and the fleet side."""
