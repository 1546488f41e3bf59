/**
 * The Mailroom client: openapi-fetch typed by the paths openapi-typescript generates from
 * `openapi/openapi.json` (`npm run generate`). Every call is checked against the spec:
 * paths, parameters, bodies, and the success and problem+json error types.
 */
import createClient, { type Client } from "openapi-fetch";

import type { components, paths } from "./schema.js";

export type { components, operations, paths } from "./schema.js";

/** A schema of the spec by name, e.g. `Schema<"AccountOut">`. */
export type Schema<Name extends keyof components["schemas"]> = components["schemas"][Name];

/** A typed client for the service at `baseUrl`, authenticated with one API key. */
export function createMailroomClient(baseUrl: string, apiKey: string): Client<paths> {
  return createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${apiKey}` } });
}
