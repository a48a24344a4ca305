"""Object storage for ``s3://`` and ``file://`` URIs, shared by the trainer, the operator and the CLI.

One small interface (:class:`Storage`) with two implementations: :class:`S3Storage` (boto3, for AWS
S3 and S3-compatible stores) and :class:`FileStorage` (a local or mounted filesystem, for laptops and
tests). :meth:`Storage.for_uri` picks one. Both give the same semantics:

* **URIs are literal.** ``s3://bucket/a%20b`` names the key ``a%20b``; nothing is percent-decoded.
* **Prefixes.** :meth:`Storage.list` of ``…/data/`` lists everything under ``data/``, recursively; of
  ``…/data`` (no trailing slash) the object ``data`` itself when it exists, else everything under
  ``data/`` (never ``data2/…``). Keys in the result are relative to the prefix (a single object's
  key is its name). A directory with no files, like an S3 prefix with no objects, does not exist.
* **Keys are checked.** :func:`safe_join` builds a URI strictly under an output prefix and refuses
  anything that could climb out of it ('..', absolute keys, backslashes, empty or '.' segments,
  control characters, percent-encoded traversal). :meth:`Storage.download_prefix` refuses objects
  whose keys would land outside the destination directory, before downloading anything.
* **Atomic writes.** A reader never sees half an object: S3 PUTs and multipart completions are
  atomic; ``file://`` writes go to a temporary file in the same directory, then are renamed.
  Downloads land in a temporary file and are renamed only after they were verified.
* **Integrity.** Uploads record the file's SHA-256 in the object metadata (``x-amz-meta-sha256``)
  and, unless ``spec.storage.checksums`` is ``when-required``, ask S3 for a SHA-256 checksum too.
  Downloads always check the size, and check the SHA-256 against every reference available: the
  caller's ``expected_sha256``, the metadata, and S3's own full-object checksum. A mismatch raises
  :class:`StorageError` and leaves no partial file behind.
* **Errors** are :class:`StorageError` (or :class:`NotFoundError`) with a message naming the URI and
  what to do. Credentials never appear in messages: they are only ever taken from the standard AWS
  environment and credential chain (the pod gets them from the Secret named by
  ``spec.storage.secretRef`` via ``secretKeyRef`` env vars, or from its IAM role), never from the
  spec; botocore's own exception text is not chained onto ours.

Local-side problems (a missing source file for an upload, an unwritable destination for a download)
surface as the usual :class:`OSError`; problems with the URI side are :class:`StorageError`.

Incomplete multipart uploads
----------------------------
A pod killed during a large upload (preemption, OOM, ``activeDeadlineSeconds``) leaves an incomplete
multipart upload behind. Its parts are invisible to listings but are stored and billed until
aborted. The trainer aborts those under its run's checkpoints when training ends (it then is the
run's only writer; that needs ``s3:ListBucketMultipartUploads`` and ``s3:AbortMultipartUpload``,
and without them it logs a warning and carries on). Uploads of a run that never finishes, and of
the final model, are left: give the bucket a lifecycle rule that aborts them, for example after
one day (:data:`ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE`)::

    {
      "Rules": [
        {
          "ID": "tuneloop-abort-incomplete-multipart-uploads",
          "Status": "Enabled",
          "Filter": {"Prefix": ""},
          "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}
        }
      ]
    }

    aws s3api put-bucket-lifecycle-configuration --bucket <bucket> \\
        --lifecycle-configuration file://lifecycle.json

``put-bucket-lifecycle-configuration`` replaces the bucket's existing rules: merge this one into them.

Modules
-------
:mod:`~tuneloop.storage.base` (the interface), :mod:`~tuneloop.storage.results` (errors and
results), :mod:`~tuneloop.storage.keys` (URIs and key safety), :mod:`~tuneloop.storage.localfiles`
(atomic, verified local files), :mod:`~tuneloop.storage.files` (the ``file://`` backend),
:mod:`~tuneloop.storage.s3` (the S3 backend) with :mod:`~tuneloop.storage.s3_config` (client
setup), :mod:`~tuneloop.storage.s3_retries`, :mod:`~tuneloop.storage.s3_errors` and
:mod:`~tuneloop.storage.s3_integrity` (recorded and checked SHA-256s), and
:mod:`~tuneloop.storage.redaction` (credentials kept out of logs). Import from here.
"""

from tuneloop.storage.base import Storage
from tuneloop.storage.files import FileStorage
from tuneloop.storage.keys import parse_s3_uri, safe_join
from tuneloop.storage.localfiles import sha256_file
from tuneloop.storage.results import (
    InvalidUriError,
    NotFoundError,
    ObjectInfo,
    PreconditionFailedError,
    StorageError,
    UnsafeKeyError,
    VersionedBytes,
)
from tuneloop.storage.s3 import S3Storage
from tuneloop.storage.s3_config import ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE
from tuneloop.storage.s3_retries import s3_request_time_bound

__all__ = [
    "ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE",
    "FileStorage",
    "InvalidUriError",
    "NotFoundError",
    "ObjectInfo",
    "PreconditionFailedError",
    "S3Storage",
    "Storage",
    "StorageError",
    "UnsafeKeyError",
    "VersionedBytes",
    "parse_s3_uri",
    "s3_request_time_bound",
    "safe_join",
    "sha256_file",
]
