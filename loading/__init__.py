"""What the story stands on: machinery a learner may skip.

``errors`` (the types of bad input), ``protocols`` (each benchmark's row), ``clip_weights`` and ``clip_tokenizer``
(OpenAI's files), ``dataset_files`` (split and caption files, opening and writing videos, the loader's workers),
``layouts`` (eight of the ten dataset layouts) and ``synthetic`` (the generated demo dataset). They import nothing
above this folder.
"""
