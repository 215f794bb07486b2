"""Keyward's shared core: the HSM-backed key store, wire stubs, logging and the admin CLI.

The data path lives in `kmsplugin` and the control path in `keyward_operator`; both build on this package,
never on each other.
"""
