"""The HSM-backed key store: named keys with numbered versions, kept and used inside a PKCS#11 token.

Both the plugin (data path) and the operator (control path) use it; it imports nothing else of Keyward's.

Modules:
- ``config``: where the PKCS#11 module, token and PIN come from.
- ``errors``: the exception hierarchy every PKCS#11 failure is translated into.
- ``keyids``: key names and the key_id that names one exact version.
- ``envelope``: the versioned ciphertext format (pure).
- ``manifests``: the per-key record of versions and states, and the state machine (pure).
- ``worker``: the one thread per process that talks to the PKCS#11 module.
- ``store``: the KeyStore that ties them together.
- ``audit``: one structured event per key operation.
"""
