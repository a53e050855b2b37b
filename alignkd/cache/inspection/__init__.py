"""Looking at a cache: `cache stats` (`stats`), `cache show` (`show`, with each family's
`vision_layout`) and the console tables (`tables`).

Reads through the format and I/O layer of `alignkd.cache`, never the teacher side.
"""
