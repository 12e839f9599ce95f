"""Shared builders of the tests: small graphs (`graphs`), the hostile-input corpus
(`hostile_corpus`) and large models written without holding them (`large_models`)."""
