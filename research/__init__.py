"""Studies: each answers one question; see research/README.md. Never
imported by the library."""
