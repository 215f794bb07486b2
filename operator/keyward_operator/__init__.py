"""The control path: EncryptionKey and RotationPolicy resources -> this Kopf operator -> the HSM key store
-> re-encryption of the objects an old version protects. (The operator arrives with the next issue.)

The package is not called ``operator``: that would shadow the standard library's ``operator`` module.
"""
