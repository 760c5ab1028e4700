"""Sticky users (`sticky:`): the Lua code that turns a user's id into a hash Envoy's
weighted choice reads, and the same hash in Python, so a test can predict where a user
goes. The split route (`xds/resources.py`) enables the code per route."""

from __future__ import annotations

from xds_server.spec import Sticky

STICKY_HEADER = "x-xds-sticky"
"""Set by the sticky Lua code to the user's hash; Envoy's weighted choice reads it."""
STICKY_MODULUS = 2_147_483_647
"""2^31 - 1: the sticky hash's range (exact in the doubles of LuaJIT and Lua 5.1)."""


def sticky_hash(user: str) -> int:
    """The hash the sticky Lua code computes (the same arithmetic): a polynomial hash of
    the UTF-8 bytes mod 2^31 - 1, then two multiplicative (MINSTD) steps to spread short
    ids. Envoy takes it % the total weight to pick a cluster; a test predicts with it."""
    h = 0
    for byte in user.encode():
        h = (h * 1_000_003 + byte) % STICKY_MODULUS
    for _ in range(2):
        h = h * 48_271 % STICKY_MODULUS
    return h


def sticky_lua(sticky: Sticky) -> str:
    """The Lua code for one sticky setting: STICKY_HEADER = sticky_hash(user), where the
    user is the value of the header (or cookie); no user, no header (a random choice).
    Products stay below 2^53, so doubles (LuaJIT, Lua 5.1) compute them exactly."""
    if sticky.header is not None:
        user = f"  return headers:get({_lua_string(sticky.header)})\n"
    else:
        assert sticky.cookie is not None
        user = _LUA_COOKIE.format(name=_lua_string(sticky.cookie))
    return _LUA_STICKY.format(user=user, header=_lua_string(STICKY_HEADER), m=STICKY_MODULUS)


_LUA_COOKIE = """\
  local cookies = headers:get("cookie")
  if cookies == nil then return nil end
  for pair in string.gmatch(cookies, "[^;]+") do
    local eq = string.find(pair, "=", 1, true)
    if eq ~= nil and (string.gsub(string.sub(pair, 1, eq - 1), "^%s+", "")) == {name} then
      return string.sub(pair, eq + 1)
    end
  end
  return nil
"""

_LUA_STICKY = """\
-- xds-server sticky users: the user's hash, for the weighted choice of the route.
local function user_of(headers)
{user}end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get({header}) ~= nil then headers:remove({header}) end
  local user = user_of(headers)
  if user == nil or user == "" then return end
  local h = 0
  for i = 1, #user do
    h = (h * 1000003 + string.byte(user, i)) % {m}
  end
  h = (h * 48271) % {m}
  h = (h * 48271) % {m}
  headers:add({header}, string.format("%d", h))
end
"""


def _lua_string(text: str) -> str:
    """A Lua string literal: letters, digits, '-' and '_' as they are, other bytes as
    decimal escapes (nothing in a header or cookie name can break out of it)."""
    safe = {ord(c) for c in "-_"}
    body = "".join(
        chr(b) if (chr(b).isascii() and chr(b).isalnum()) or b in safe else f"\\{b:03d}"
        for b in text.encode()
    )
    return f'"{body}"'
