"""Version of the library and of the formats it writes (base layer: no flextron imports).

``RUN_FORMAT`` is recorded in a run directory (``flextron_run.json``, written when the directory
is created), ``CHECKPOINT_FORMAT`` in an elastic checkpoint (``flextron.json``) and
``ROUTER_FORMAT`` in a router directory (``routers.json``), each under the key ``"format"``. A
reader accepts the versions listed in ``*_FORMATS_READ`` and refuses any other, naming it
(:func:`flextron.files.check_format`); a file without the key was written before formats were
recorded and counts as version 1.
"""

from __future__ import annotations

__version__ = "0.2.0"

#: format of a run directory written by this version (``flextron_run.json`` → ``"format"``)
RUN_FORMAT = 1
#: format of an elastic checkpoint written by this version (``flextron.json`` → ``"format"``)
CHECKPOINT_FORMAT = 1
#: formats this version reads; files written before formats were recorded count as version 1
RUN_FORMATS_READ = (1,)
CHECKPOINT_FORMATS_READ = (1,)
#: format of a router directory (``routers.json`` → ``"format"``): 2 records the router's kind and
#: constructor arguments; 1 (no key) is a static router of flextron 0.1, rebuilt from the run's config
ROUTER_FORMAT = 2
ROUTER_FORMATS_READ = (1, 2)
