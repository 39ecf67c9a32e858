"""The logic behind `cloister policy`: validate, sign, push, diff and explain policy bundles.

Importable and testable without the command line; `cloister/cli/policy.py` only parses
arguments and prints. Each module does one thing:

- `cedarsrc`: Cedar source split into statements, parse errors placed on lines;
- `schema`: a Cedar schema generated from entities.toml (and optional tool input schemas);
- `findings`: what validation found and where (file, line), and the policies as written;
- `validate`: every problem in a bundle, with file and line;
- `schemacheck`: policies and entities against the bundle's schema, or a generated one;
- `source`: a bundle from a directory or a signed file;
- `signing`: admin keys, signing, pushing to a relay;
- `diff`: what changed between two bundles;
- `explain`: an offline decision with the enclave's own engine.
"""
