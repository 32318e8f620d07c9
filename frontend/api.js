/** The API client: bearer token kept in sessionStorage, JSON in and out, errors turned into plain words. */

export const API_PREFIX = "/api/v1";
const TOKEN_KEY = "flglm.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  save: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** What a person should read for an HTTP error: the cause first, the server's own detail after it. */
function plainWords(status, error) {
  const detail = error && error.message ? ` Server said: ${error.message}.` : "";
  switch (status) {
    case 401:
      return "Your API token was not accepted (unknown, revoked or missing). Sign in again.";
    case 403:
      return `Your token is not allowed to do this; it needs the admin role.${detail}`;
    case 404:
      return `That item does not exist (any more).${detail}`;
    case 409:
      return `That is not possible in the current state.${detail}`;
    case 413:
      return "The request is too large for the server.";
    case 422:
      return `Some input was rejected.${detail}`;
    case 429:
      return "Too many requests in a short time; wait a moment and try again.";
    default:
      return `The server answered with an error (HTTP ${status}).${detail}`;
  }
}

async function send(method, path, body, accept) {
  const headers = { Accept: accept };
  const token = session.token();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API_PREFIX + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", "The control plane cannot be reached. Is `flglm serve` running?");
  }
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    const error = data && data.error;
    throw new ApiError(response.status, error ? error.code : "http_error", plainWords(response.status, error));
  }
  return response;
}

export async function request(method, path, body) {
  const response = await send(method, path, body, "application/json");
  return response.json().catch(() => null);
}

/** A file the API sends as an attachment (the bearer token rules out a plain link): its bytes and name. */
export async function download(path, fallbackName) {
  const response = await send("GET", path, undefined, "*/*");
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = disposition.match(/filename="([^"]+)"/);
  return { blob: await response.blob(), filename: match ? match[1] : fallbackName };
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body);
export const del = (path) => request("DELETE", path);

/** Query string from an object, leaving out empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
