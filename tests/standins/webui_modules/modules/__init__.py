"""Stand-in of AUTOMATIC1111's ``modules`` package (only what an extension script touches)."""
