"""The zoo: small local generators trained on real images, stand-ins for real generators.

``python -m detector.zoo OUT`` builds it (docs/zoo.md): one folder per member, each a
different family of upsampling or decoding, with ``train/`` and ``test/`` ``{FAKE,REAL}``
folders of 32x32 JPEGs (q75 in both classes) and a ``member.json`` of its settings.
"""
