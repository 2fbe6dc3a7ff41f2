"""Plot writers (PNG files); the only I/O in metarun's metric code lives here."""
