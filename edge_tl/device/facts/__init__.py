"""Facts about the device, read under one ``root`` (tests point it at a recorded tree)."""
