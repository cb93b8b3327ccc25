"""The snapshot format and repository: manifests, packs and the blob codec, chunking, prune,
transfer. Written against rsnap.store's Backend interface; the backends know nothing of it."""
