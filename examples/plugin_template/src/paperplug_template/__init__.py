"""An external paperplug plugin package (a template to copy): the VICReg objective."""

__version__ = "0.1.0"
