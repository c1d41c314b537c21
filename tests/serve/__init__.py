"""A package, so that the Serve deployment fixture can be package-scoped (pytest's
package scope means the whole session in a folder without ``__init__.py``)."""
