"""What stands on the story: machinery a learner may skip.

``runtime`` (device, precision, the frozen backbone, ``--compile``, torchrun), ``runs`` (the run folder and the
checkpoint format) and ``cli`` (the commands' options and their one error line). They import the story
(``stop``, ``data``, ``clip_model``) and ``loading``; nothing below imports them.
"""
