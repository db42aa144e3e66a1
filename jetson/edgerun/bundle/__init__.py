"""The bundle: its manifest (the schema, once), safe archives, opening, signing, pins, slots."""
