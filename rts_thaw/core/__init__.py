"""The ground floor: what every layer shares (files written atomically, vector IO and
reprojection, the RLE codec, the class constants, checkpoint reading). It imports no
other rts_thaw package; tests/test_import_graph.py holds that."""
