"""Networks and model bundles (torch lives here; import submodules explicitly).

``wsiflow.models.bundle`` imports torch only when weights are built or saved, so reading
a card stays cheap.
"""
