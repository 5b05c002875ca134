"""POST a WAV file to the appliance's /transcribe over HTTPS, verifying the server against the
given CA, and print the JSON answer. (Ansible's uri module is not binary-safe for multipart
uploads: its MIME encoder rewrites line endings inside the audio.)

usage: transcribe.py URL CA_FILE AUDIO_FILE
"""

import json
import ssl
import sys
import urllib.request
import uuid
from pathlib import Path

url, ca_file, audio = sys.argv[1:4]
boundary = uuid.uuid4().hex
body = b"".join(
    [
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="file"; filename="{Path(audio).name}"\r\n'.encode(),
        b"Content-Type: audio/wav\r\n\r\n",
        Path(audio).read_bytes(),
        f"\r\n--{boundary}--\r\n".encode(),
    ]
)
request = urllib.request.Request(  # noqa: S310 - the URL is the test's own https:// address
    url,
    data=body,
    method="POST",
    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
)
context = ssl.create_default_context(cafile=ca_file)
with urllib.request.urlopen(request, context=context, timeout=120) as response:  # noqa: S310
    print(json.dumps(json.load(response)))
