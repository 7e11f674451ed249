"""Every expected failure as a 4xx (or 503 when busy) with a JSON `detail` saying what is wrong and what
is accepted. Bad input never reaches the 500 handler."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from brainmets.api.service import ModelNotInstalled, Overloaded
from brainmets.dicomweb import NotConfigured, PacsError, StudyNotFound, UnusableStudy
from brainmets.inference import InputError
from brainmets.inputs.readers import ImageReadError, ImageTooLarge, UnsupportedFormat
from brainmets.inputs.errors import StudyError, StudyTooLarge

STATUS = {  # most specific first: a handler is looked up along the exception's class hierarchy
    ImageTooLarge: 413,
    StudyTooLarge: 413,
    StudyError: 422,
    UnsupportedFormat: 415,
    ImageReadError: 422,
    InputError: 422,
    ModelNotInstalled: 404,
    Overloaded: 503,
    NotConfigured: 404,
    StudyNotFound: 404,
    UnusableStudy: 422,
    PacsError: 502,  # the PACS is unreachable, refuses our credentials or our SEG: a bad gateway
}
RETRY_AFTER_S = 1  # one inference takes tens of ms; a second clears a full queue on 2 cores


def install(app: FastAPI) -> None:
    for exc_class in STATUS:
        app.add_exception_handler(exc_class, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(code for cls, code in STATUS.items() if isinstance(exc, cls))
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: the traceback goes to the server's log, the client gets JSON without internals."""
    return JSONResponse({"detail": "internal server error: the request could not be processed; the server "
                                   "logged the cause"}, status_code=500)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One sentence per problem instead of FastAPI's list of dicts, naming the field and what it takes."""
    problems = []
    for error in exc.errors():
        where, *path = [str(p) for p in error["loc"]] or ["request"]
        name = ".".join(path)
        if where == "body" and error["type"] == "missing":
            problems.append(f"multipart form field '{name}' is missing: send the file as multipart/form-data "
                            f"in a field named '{name}'")
        elif where == "body":
            problems.append(f"multipart form field '{name}': {error['msg']}; expected a file upload")
        else:
            given = f" (got {str(error['input'])[:60]!r})" if "input" in error else ""
            problems.append(f"{where} parameter '{name}'{given}: {error['msg']}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)
