/**
 * A tiny typed client for Carnet, typed entirely from `carnet.d.ts` (generated from openapi/openapi.json).
 *
 * Nothing here is hand-written about the API's shapes: paths, methods, path/query/header parameters,
 * request bodies and response bodies all come from the generated `paths`, so a breaking change in the
 * contract (a renamed field, a removed route, a new required parameter) fails `tsc --noEmit` at once.
 *
 * Type-check: `bin/check-ts` (or `npm run typecheck` here). Run it against a server (Node 20+), from openapi/ts:
 * `npx tsc -p tsconfig.json --noEmit false --outDir build && CARNET=http://localhost:8000 TOKEN=... node build/example.js`.
 */
import type { components, paths } from "./carnet";

export type Problem = components["schemas"]["Problem"];
export type Contact = components["schemas"]["ContactRead"];
/** What a contacts write answers a token without `contacts:read`: the id, whether it was created, the version. */
export type ContactReceipt = components["schemas"]["ContactReceipt"];

export function isReceipt(body: Contact | ContactReceipt): body is ContactReceipt {
  return !("email_status" in body);
}

type Method = "get" | "post" | "put" | "patch" | "delete";

/** Paths that declare this method (`put?: never` in the generated types means "not served"). */
type PathsWith<M extends Method> = {
  [P in keyof paths]: paths[P] extends { [K in M]: infer O } ? (O extends object ? P : never) : never;
}[keyof paths];

type Operation<P extends keyof paths, M extends Method> = paths[P] extends { [K in M]: infer O } ? O : never;

type PathArgs<O> = O extends { parameters: { path: infer A } } ? { path: A } : { path?: undefined };
type QueryArgs<O> = O extends { parameters: { query?: infer Q } } ? { query?: Q } : { query?: undefined };
type HeaderArgs<O> = O extends { parameters: { header?: infer H } } ? { header?: H } : { header?: undefined };
type BodyOf<O> = O extends { requestBody: { content: infer C } }
  ? C extends { "application/json": infer B } ? B : C[keyof C]
  : never;
type BodyArgs<O> = [BodyOf<O>] extends [never] ? { body?: undefined } : { body: BodyOf<O> };

export type RequestArgs<O> = PathArgs<O> & QueryArgs<O> & HeaderArgs<O> & BodyArgs<O>;

type Responses<O> = O extends { responses: infer R } ? R : never;
type JsonOf<R> = R extends { content: { "application/json": infer B } } ? B : undefined;
/** The union of every 2xx body the operation documents (204 → undefined). */
export type SuccessBody<O> = {
  [S in keyof Responses<O>]: S extends 200 | 201 | 202 | 204 ? JsonOf<Responses<O>[S]> : never;
}[keyof Responses<O>];

export type Result<O> =
  | { ok: true; status: number; data: SuccessBody<O>; etag: string | null; response: Response }
  | { ok: false; status: number; problem: Problem; response: Response };

/** Thrown for an answer that is neither a documented success nor problem+json (a proxy's HTML page, say). */
export class UnexpectedResponse extends Error {
  constructor(readonly status: number, readonly body: string) {
    super(`unexpected ${status} response`);
  }
}

export class CarnetClient {
  constructor(
    private readonly baseUrl: string,
    private readonly token: string,
    private readonly fetchImpl: typeof fetch = fetch,
  ) {}

  async request<M extends Method, P extends PathsWith<M>>(
    method: M,
    path: P,
    args: NoInfer<RequestArgs<Operation<P, M>>>,
  ): Promise<Result<Operation<P, M>>> {
    const { path: pathParams, query, header, body } = args as {
      path?: Record<string, string>;
      query?: Record<string, unknown>;
      header?: Record<string, string | null | undefined>;
      body?: unknown;
    };
    const url = new URL(
      String(path).replace(/\{(\w+)\}/g, (_, name: string) => encodeURIComponent(pathParams?.[name] ?? "")),
      this.baseUrl,
    );
    for (const [name, value] of Object.entries(query ?? {})) {
      for (const item of Array.isArray(value) ? value : [value]) {
        if (item !== undefined && item !== null) url.searchParams.append(name, String(item));
      }
    }
    const headers = new Headers({ Authorization: `Bearer ${this.token}`, Accept: "application/json" });
    for (const [name, value] of Object.entries(header ?? {})) {
      if (value !== undefined && value !== null) headers.set(name, value);
    }
    if (body !== undefined) headers.set("Content-Type", "application/json");
    const response = await this.fetchImpl(url, {
      method: method.toUpperCase(),
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const type = response.headers.get("content-type") ?? "";
    if (response.ok) {
      const data = (response.status === 204 ? undefined : await response.json()) as SuccessBody<Operation<P, M>>;
      return { ok: true, status: response.status, data, etag: response.headers.get("etag"), response };
    }
    if (type.startsWith("application/problem+json")) {
      return { ok: false, status: response.status, problem: (await response.json()) as Problem, response };
    }
    throw new UnexpectedResponse(response.status, await response.text());
  }
}

/** Create a contact; on a 409 `duplicate-contact`, return the contact that already holds the email. */
export async function createOrFind(client: CarnetClient, email: string, firstName: string): Promise<Contact> {
  const created = await client.request("post", "/v1/contacts", {
    body: { email, first_name: firstName, source: "website_signup" },
    header: { "idempotency-key": `signup-${email}` },  // a retried signup replays the first answer
  });
  if (created.ok) return isReceipt(created.data) ? readContact(client, created.data.id) : created.data;
  const { problem } = created;
  if (problem.type.endsWith("/duplicate-contact") && problem.existing_id) return readContact(client, problem.existing_id);
  throw describe(problem);
}

async function readContact(client: CarnetClient, id: string): Promise<Contact> {
  const existing = await client.request("get", "/v1/contacts/{contact_id}", { path: { contact_id: id } });
  if (existing.ok) return existing.data;
  throw describe(existing.problem);
}

/** Read with its ETag, then patch with If-Match; on 412 someone else won: read again and retry. */
export async function renameSafely(client: CarnetClient, id: string, lastName: string): Promise<Contact> {
  for (let attempt = 0; attempt < 5; attempt++) {
    const current = await client.request("get", "/v1/contacts/{contact_id}", { path: { contact_id: id } });
    if (!current.ok) throw describe(current.problem);
    const etag = current.etag ?? `"v${current.data.version}"`;
    const patched = await client.request("patch", "/v1/contacts/{contact_id}", {
      path: { contact_id: id },
      header: { "if-match": etag },
      body: { last_name: lastName },
    });
    if (patched.ok) return isReceipt(patched.data) ? readContact(client, id) : patched.data;
    if (patched.status !== 412) throw describe(patched.problem);
  }
  throw new Error("gave up after 5 conflicting writes");
}

/** Every contact, page by page: pass `next_cursor` back as `cursor` with the same sort and filters. */
export async function* allContacts(client: CarnetClient, tag?: string): AsyncGenerator<Contact> {
  let cursor: string | null = null;
  do {
    const page = await contactPage(client, cursor, tag);
    yield* page.data;
    cursor = page.next_cursor;
  } while (cursor !== null);
}

async function contactPage(client: CarnetClient, cursor: string | null, tag?: string) {
  const page = await client.request("get", "/v1/contacts", {
    query: { sort: "last_name", limit: 200, cursor, tag: tag ? [tag] : undefined },
  });
  if (!page.ok) throw describe(page.problem);
  return page.data;  // components["schemas"]["ContactPage"]: {data, next_cursor}
}

/** A problem+json as one readable error: its type slug, detail, and each faulty field for a 422. */
export function describe(problem: Problem): Error {
  const slug = problem.type.split("/").pop() ?? problem.type;
  const fields = (problem.errors ?? []).map((e) => `${e.field}: ${e.message} (${e.code})`);
  const scopes = problem.missing_scopes?.length ? [`missing scopes: ${problem.missing_scopes.join(", ")}`] : [];
  return new Error([`${problem.status} ${slug}: ${problem.detail}`, ...fields, ...scopes].join("\n  "));
}

async function main(): Promise<void> {
  const env = (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env ?? {};
  const client = new CarnetClient(env.CARNET ?? "http://localhost:8000", env.TOKEN ?? "");
  const claire = await createOrFind(client, "claire.martin@example.com", "Claire");
  const renamed = await renameSafely(client, claire.id, "Martin");
  console.log(`contact ${renamed.id} is at version ${renamed.version}`);
  let count = 0;
  for await (const contact of allContacts(client)) count += contact.pii_masked ? 0 : 1;
  console.log(`${count} contacts visible unmasked`);
  const invalid = await client.request("post", "/v1/contacts", { body: { email: "not-an-email" } });
  if (!invalid.ok) console.log(describe(invalid.problem).message);
}

if (import.meta.url === `file://${(globalThis as { process?: { argv: string[] } }).process?.argv[1]}`) {
  main().catch((error: unknown) => {
    console.error(error);
    (globalThis as { process?: { exitCode?: number } }).process!.exitCode = 1;
  });
}
