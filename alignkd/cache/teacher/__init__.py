"""The teacher side of the cache: `cache build`'s teacher pass (`build`), the capture of one
batch into records (`teacher_pass`) and the sparse logit encodings (`sparse_logits`).

It writes through the format and I/O layer of `alignkd.cache` and is never imported by
it: reading, verifying or querying a cache loads nothing from here.
"""
