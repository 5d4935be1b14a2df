"""The foundation every other layer stands on: errors, identities, option declarations,
progress lines, bounded reads of untrusted files, lazy public names, the version and the
settings-file parser. It imports nothing else from the project (docs/design.md, "Layers")."""
