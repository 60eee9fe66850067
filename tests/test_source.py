"""One decoding of handler source: the rule, case by case, without sockets."""

import pytest

from agent.errors import ValidationFailed
from agent.source import decode_source

ACCEPTED = [
    (b"x = 1\n", "x = 1\n"),
    (b"# -*- coding: utf-8 -*-\nx = 1\n", "# -*- coding: utf-8 -*-\nx = 1\n"),
    (b"# coding=UTF8\n", "# coding=UTF8\n"),
    (b"#!/usr/bin/env python3\n# vim: set fileencoding=utf_8 :\n", "#!/usr/bin/env python3\n# vim: set fileencoding=utf_8 :\n"),
    (b"\xef\xbb\xbfx = 1\n", "x = 1\n"),  # a byte-order mark is dropped, as Python drops it
    ("s = 'caf\u00e9'\n".encode(), "s = 'caf\u00e9'\n"),
    (b"x = 1\n# coding: latin-1\n", "x = 1\n# coding: latin-1\n"),  # line 2 counts only below a comment
    (b"x = 1\n\n# coding: utf_7\n", "x = 1\n\n# coding: utf_7\n"),  # line 3 never counts
]
REFUSED = [
    (b"# -*- coding: utf_7 -*-\n#+AAo-import os\n", "declares the encoding 'utf_7'"),
    (b"# coding: latin-1\nx = 1\n", "declares the encoding 'latin-1'"),
    (b"#!/usr/bin/python\n# -*- coding: cp1252 -*-\n", "declares the encoding 'cp1252'"),
    (b"# coding=no-such-codec\n", "declares the encoding 'no-such-codec'"),
    (b"x = '\xe9'\n", "is not valid UTF-8 (byte 5)"),
]


@pytest.mark.parametrize("data, text", ACCEPTED)
def test_accepted_sources_decode_to_the_text_every_step_compiles(data, text):
    assert decode_source("cam", data) == text


@pytest.mark.parametrize("data, words", REFUSED)
def test_other_encodings_are_refused_with_what_to_change(data, words):
    with pytest.raises(ValidationFailed) as refused:
        decode_source("cam", data)
    assert refused.value.message.startswith("Code validation failed: cam.py ")
    assert words in refused.value.message


def test_the_text_means_what_the_checks_saw_whatever_a_cookie_says():
    """The trap: compiled from bytes, a utf_7 cookie turns a comment into code; compiled from text it cannot."""
    data = b"# -*- coding: utf_7 -*-\n#+AAo-x = 1\n"
    namespace = {}
    exec(compile(data, "cam.py", "exec"), namespace)
    assert namespace["x"] == 1  # what the loader used to run
    namespace = {}
    exec(compile(data.decode("utf-8"), "cam.py", "exec"), namespace)
    assert "x" not in namespace  # what every step compiles now (and the cookie is refused before that)
