"""AUTOMATIC1111's web API, ``/sdapi/v1``: the paths, field names, defaults and answers its clients expect.

Routes only translate: an A1111 body becomes GenerationRequest fields (``build_request`` validates
them, and its errors are renamed back to the A1111 field by ``DIALECT``), a finished Job becomes
A1111's answer. A script lienzo does not have is refused (422), as A1111 refuses one it lacks. Fields
lienzo does not implement yet (face restoration, ...) are accepted; those a request
turned on are named in the answer's ``info`` (``ignored``) and its ``X-Lienzo-Ignored`` header, so a
client can tell its picture was made without them.

- ``schemas``: the bodies, with A1111's names and defaults, and A1111's error body
- ``translate``: an A1111 body as a GenerationRequest; A1111's field names; checkpoints by title
- ``answers``: a Job as A1111's ``info`` and progress; models and infotexts as A1111 lists them
- ``options``: the settings clients set through ``/options``, kept in the data dir
- ``routes``: the paths
- ``controlnet``: sd-webui-controlnet's units in ``alwayson_scripts`` and its ``/controlnet`` paths
"""

from lienzo.server.routes.a1111 import controlnet
from lienzo.server.routes.a1111.routes import router
from lienzo.server.routes.a1111.schemas import PREFIX
from lienzo.server.routes.a1111.translate import DIALECT

__all__ = ["DIALECT", "PREFIX", "controlnet", "router"]
