"""Re-encryption: after a rotation, every stored object is written again under the new primary version.

The steps, one module each: ``adoption`` (has every apiserver adopted the key?), ``objects`` (list a
resource as metadata, a page at a time; the no-op write), ``rewriting`` (the paged, rate-limited rewrite
loop), ``record`` (the run as status.reencryption keeps it, and when a run starts), ``runner`` (one step
at a time for each key's Kopf daemon). Retirement of the superseded version reads the record; it lives
with the other lifecycle decisions in ``keyward_operator.retirement``.
"""
