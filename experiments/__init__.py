"""Command-line binaries (thin absl wrappers around the library)."""
