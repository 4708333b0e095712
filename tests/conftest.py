"""Suite-wide set-up: the card index of this test run lives in a temporary directory, so the
tests neither read a developer's index nor leave one behind."""

import os
import tempfile

os.environ.setdefault("PAPERPLUG_CACHE_DIR", tempfile.mkdtemp(prefix="paperplug-test-cache-"))
