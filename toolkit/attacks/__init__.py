"""Model-extraction attacks. Each sees the victim only through ``toolkit.oracle.Oracle``."""
