"""Small stand-ins for the parts of the WebUIs that cannot be installed here (see each module's docstring)."""
