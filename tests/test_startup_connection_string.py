"""A connection string the storage SDK refuses stops start-up with one line, not a traceback
(auth.connect_with_key), even one that got past config.check_connection_string."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from uploader.auth import connect_with_key
from uploader.config import load_settings
from uploader.errors import StartupError

SECRET = "c2VjcmV0LWFjY291bnQta2V5LXZhbHVl/Zz+Qw=="


@pytest.mark.parametrize(
    "connection_string",
    ["garbage", f"BlobSecondaryEndpoint=https://x.blob.core.windows.net;AccountName=a;AccountKey={SECRET}"],
)
def test_a_connection_string_the_sdk_refuses_is_a_startup_error_naming_the_variable(
    connection_string: str,
) -> None:
    valid = load_settings(
        azure_container="abc", azure_auth="key", azure_connection_string="UseDevelopmentStorage=true"
    )
    # As if validation had missed it: model_copy does not validate.
    settings = valid.model_copy(update={"azure_connection_string": SecretStr(connection_string)})
    with pytest.raises(StartupError) as info:
        connect_with_key(settings, pool_size=4)
    message = str(info.value)
    assert message.startswith("APP_AZURE_CONNECTION_STRING cannot be used: ValueError: ")
    assert "\n" not in message
    assert SECRET not in message
