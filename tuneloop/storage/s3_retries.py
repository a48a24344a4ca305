"""How S3 requests are retried: the bound on how long one request can take to fail
(:func:`s3_request_time_bound`), which broken answers count as retryable, and the WARNING logged
for each retry botocore makes (:class:`_RetryReporter`).

botocore's ``standard`` retry mode does the retrying; this module only describes and reports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

from botocore.exceptions import ConnectTimeoutError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

from tuneloop.storage.s3_config import _display_endpoint

# One logger for the whole package: the messages are documented as coming from "tuneloop.storage".
logger = logging.getLogger(__package__)

# botocore's standard retry mode waits rand(0, 1) × min(scale × 2 ** (i - 1), 20 s) before retry i;
# scale is 1 s for throttling errors (and for every error before botocore 1.40), 0.05 s otherwise.
_BOTOCORE_BACKOFF_SCALE: Final = 1.0
_BOTOCORE_MAX_BACKOFF: Final = 20.0
# botocore sends uploads with "Expect: 100-continue" and waits up to 1 s for the "100 Continue".
_BOTOCORE_CONTINUE_WAIT: Final = 1.0


def s3_request_time_bound(connect_timeout: float, read_timeout: float, max_attempts: int) -> float:
    """The longest one small S3 request can take to fail, in seconds, when the endpoint never answers.

    Each attempt waits at most ``connect_timeout`` to connect, 1 s for a "100 Continue" (requests
    with a body) and ``read_timeout`` for the answer; before attempt i + 1, botocore's standard retry
    mode waits at most min(2 ** (i - 1), 20) s (its largest back-off scale, for throttling errors;
    other errors wait 1/20 of that). Not covered: DNS resolution, and a host with several addresses,
    each of which may take ``connect_timeout``.
    """
    backoff = sum(min(_BOTOCORE_BACKOFF_SCALE * 2.0 ** (i - 1), _BOTOCORE_MAX_BACKOFF) for i in range(1, max_attempts))
    return max_attempts * (connect_timeout + _BOTOCORE_CONTINUE_WAIT + read_timeout) + backoff


_ATTEMPT_STARTED: Final = "tuneloop_attempt_started"
_ATTEMPT_FAILURE: Final = "tuneloop_attempt_failure"
#: How the reading of an answer's body breaks off (connection reset, truncated, stalled).
_BROKEN_BODY_ERRORS: Final = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError)
_RETRIED_ERROR_CODES: Final = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)


class _RetryReporter:
    """Logs one WARNING on ``tuneloop.storage`` for each retry of an S3 request, so that a slow or
    stalled store shows progress (on the console of ``tuneloop run``, in pod logs) instead of silence.

    It only observes botocore's events and returns nothing, so botocore's own retry handler alone
    decides whether and when to retry: after each attempt (``needs-retry``) it notes why the attempt
    failed; before each attempt (``request-created``, after botocore's back-off) it reports the
    failure that led to it. A failure botocore does not retry is reported by the StorageError alone.
    Only the host contacted, the operation, bucket and key and the error's class or status are
    logged; never headers, signatures or credentials.
    """

    def __init__(self, max_attempts: int, timeouts: str, redact: Callable[[str], str]) -> None:
        self.max_attempts = max_attempts
        self.timeouts = timeouts
        self._redact = redact

    def register(self, events: Any) -> None:
        events.register("request-created.s3", self.attempt_starts, unique_id="tuneloop-retry-report-start")
        events.register_last("needs-retry.s3", self.attempt_ended, unique_id="tuneloop-retry-report-end")

    @staticmethod
    def _problem(response: Any, caught: BaseException | None) -> tuple[str, str] | None:
        """(what the endpoint did, the error's class or HTTP status) for a failure botocore may retry."""
        if caught is not None:
            verb = "is not answering" if isinstance(caught, (ConnectTimeoutError, ReadTimeoutError)) else "failed"
            return verb, type(caught).__name__
        if not isinstance(response, tuple) or len(response) != 2:
            return None
        http_response, parsed = response
        status = getattr(http_response, "status_code", None)
        error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
        code = str(error.get("Code", "")) if isinstance(error, dict) else ""
        if not (isinstance(status, int) and (status >= 500 or status == 429)) and code not in _RETRIED_ERROR_CODES:
            return None
        return "answered", f"HTTP {status} {code}".rstrip()

    def attempt_ended(self, **kwargs: Any) -> None:
        try:
            self._note_failure(**kwargs)
        except Exception:  # a report must never turn into a failed request
            logger.debug("could not note a failed S3 attempt", exc_info=True)

    def attempt_starts(self, **kwargs: Any) -> None:
        try:
            self._report_retry(**kwargs)
        except Exception:  # a report must never turn into a failed request
            logger.debug("could not report an S3 retry", exc_info=True)

    def _note_failure(self, request_dict: Any = None, response: Any = None, **kwargs: Any) -> None:
        context = request_dict.get("context") if isinstance(request_dict, dict) else None
        if not isinstance(context, dict):
            return
        problem = self._problem(response, kwargs.get("caught_exception"))
        if problem is None:
            context.pop(_ATTEMPT_FAILURE, None)
        else:
            context[_ATTEMPT_FAILURE] = (problem, _display_endpoint(request_dict.get("url")), time.monotonic())

    def _report_retry(self, request: Any = None, operation_name: str = "request", **kwargs: Any) -> None:
        context = getattr(request, "context", None)
        if not isinstance(context, dict):
            return
        now = time.monotonic()
        started = context.get(_ATTEMPT_STARTED)
        context[_ATTEMPT_STARTED] = now
        failure = context.pop(_ATTEMPT_FAILURE, None)
        if failure is None:
            return
        (verb, detail), host, failed_at = failure
        retries = context.get("retries")
        attempt = retries.get("attempt", "?") if isinstance(retries, dict) else "?"
        params = context.get("input_params")
        params = params if isinstance(params, dict) else {}
        target = operation_name
        if params.get("Bucket"):
            target += f" s3://{params['Bucket']}/{params.get('Key') or params.get('Prefix') or ''}"
        took = f" after {failed_at - started:.1f} s" if isinstance(started, float) else ""
        logger.warning(
            "S3 %s %s (%s%s) for %s; retrying: attempt %s of %d, after a %.1f s back-off (%s)",
            host,
            verb,
            detail,
            took,
            self._redact(target),
            attempt,
            self.max_attempts,
            now - failed_at,
            self.timeouts,
        )
