"""The data path: kube-apiserver -> Unix socket -> this KMS v2 plugin -> the HSM-backed key store.

Modules, in the order a request meets them:
- ``listener``: the socket file's lifecycle (stale file removal, permissions, clean-up).
- ``server``: builds the gRPC server, wires the parts together, handles signals.
- ``service``: the three KMS v2 methods, error-to-status mapping and one audit event per call.
- ``limits``: the apiserver's own limits, checked on every request and response.
- ``keyview``: which version is primary and which key_ids decrypt, refreshed from the token.
- ``health``: the Status round trip through the HSM, cached and bounded in time.
"""
