/**
 * A whole user scenario through the generated client, against a running Mailroom.
 *
 * tests/client/test_typescript_client.py starts the service with a Dovecot POP3 mailbox and
 * an aiosmtpd server behind it, then runs this with `MAILROOM_SCENARIO` (JSON, see `Setup`).
 * Every step checks what it gets and throws on the first surprise (exit code 1); at the end
 * one JSON line on stdout reports what the Python side checks on the servers.
 */
import { createHash } from "node:crypto";

import { createMailroomClient, type Schema } from "./client.js";

/** What the test passes in: where the service and the mail servers are, what was delivered. */
interface Setup {
  base_url: string;
  api_key: string;
  pop3: { host: string; port: number; user: string; password: string };
  smtp: { host: string; port: number };
  /** Messages waiting in the POP3 mailbox. */
  mailbox_count: number;
  /** The one of them with attachments: its subject, its raw bytes' SHA-256, its attachments. */
  with_attachments: {
    subject: string;
    raw_sha256: string;
    attachments: { filename: string; content_type: string; content_base64: string }[];
  };
}

/** Bounds for polling a background job (a bounded wait, not a speed check). */
const POLL_DEADLINE_MS = 60_000;
const POLL_INTERVAL_MS = 100;
const PAGE_SIZE = 2;

function check(condition: unknown, message: string): asserts condition {
  if (!condition) {
    throw new Error(`scenario: ${message}`);
  }
}

/** Calls `read` until `done` holds for its result, or fails after the deadline. */
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean): Promise<T> {
  const deadline = Date.now() + POLL_DEADLINE_MS;
  for (;;) {
    const value = await read();
    if (done(value)) {
      return value;
    }
    check(Date.now() < deadline, `gave up waiting; last value ${JSON.stringify(value)}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
  }
}

function sha256(bytes: ArrayBuffer): string {
  return createHash("sha256").update(new Uint8Array(bytes)).digest("hex");
}

function sameBytes(got: ArrayBuffer, expectedBase64: string): boolean {
  return Buffer.from(got).equals(Buffer.from(expectedBase64, "base64"));
}

async function main(): Promise<void> {
  const setup = JSON.parse(process.env["MAILROOM_SCENARIO"] ?? "") as Setup;
  const client = createMailroomClient(setup.base_url, setup.api_key);

  // 1. Create an account: POP3 on Dovecot (STARTTLS), SMTP on aiosmtpd.
  const accountBody: Schema<"AccountInput"> = {
    name: "TypeScript",
    email: "ts@example.com",
    display_name: "TypeScript Client",
    incoming: {
      host: setup.pop3.host,
      port: setup.pop3.port,
      security: "starttls",
      username: setup.pop3.user,
      password: setup.pop3.password,
    },
    outgoing: {
      host: setup.smtp.host,
      port: setup.smtp.port,
      security: "none",
    },
  };
  const created = await client.POST("/v1/accounts", { body: accountBody });
  check(created.response.status === 201 && created.data, `create: ${created.response.status}`);
  const account: Schema<"AccountOut"> = created.data;
  check(account.incoming.port === setup.pop3.port, "create: the POP3 port is kept");
  const path = { account_id: account.id };

  // 2. Verify it, like a mail client's "Test Account Settings".
  const verified = await client.POST("/v1/accounts/{account_id}/verify", { params: { path } });
  check(verified.data, `verify: ${JSON.stringify(verified.error)}`);
  check(verified.data.ok, `verify: ${JSON.stringify(verified.data)}`);
  check(verified.data.incoming.steps.every((step) => step.ok), "verify: every POP3 step ok");

  // 3. Send a message with an attachment, safe to retry with an Idempotency-Key.
  const attachment = Buffer.from(Array.from({ length: 600 }, (_, i) => (i * 7) % 256));
  const send: Schema<"SendRequest"> = {
    to: ["reader@example.com"],
    subject: "Hello from TypeScript",
    text: "Body.\n",
    attachments: [
      {
        filename: "sent.bin",
        content_type: "application/octet-stream",
        content_base64: attachment.toString("base64"),
      },
    ],
  };
  const header = { "Idempotency-Key": `ts-${account.id}` };
  const accepted = await client.POST("/v1/accounts/{account_id}/outbox", {
    params: { path, header },
    body: send,
  });
  check(accepted.response.status === 202 && accepted.data, `send: ${accepted.response.status}`);
  const outgoingId = accepted.data.id;
  check(
    accepted.response.headers.get("Location") === `/v1/accounts/${account.id}/outbox/${outgoingId}`,
    "send: Location names the new message",
  );
  const replay = await client.POST("/v1/accounts/{account_id}/outbox", {
    params: { path, header },
    body: send,
  });
  check(replay.response.status === 200 && replay.data?.id === outgoingId, "send: replayed");
  check(replay.response.headers.get("Idempotency-Replayed") === "true", "send: replay header");

  // 4. A typed 409: the same key with another body.
  const reused = await client.POST("/v1/accounts/{account_id}/outbox", {
    params: { path, header },
    body: { ...send, subject: "Another subject" },
  });
  check(reused.error, "reused key: an error");
  check(reused.response.status === 409, `reused key: ${reused.response.status}`);
  check(reused.error.code === "idempotency_key_reused", `reused key: ${reused.error.code}`);

  // 5. Poll until delivered.
  const outgoingPath = { ...path, outgoing_id: outgoingId };
  const delivered = await until(
    async () => {
      const got = await client.GET("/v1/accounts/{account_id}/outbox/{outgoing_id}", {
        params: { path: outgoingPath },
      });
      check(got.data, `poll outgoing: ${JSON.stringify(got.error)}`);
      return got.data;
    },
    (message) => message.status === "sent" || message.status === "failed",
  );
  check(delivered.status === "sent", `delivery: ${JSON.stringify(delivered)}`);
  check(delivered.recipients.every((r) => r.status === "sent"), "delivery: every recipient");

  // The Sent Items copy, as bytes: what the SMTP server received.
  const sentCopy = await client.GET("/v1/accounts/{account_id}/outbox/{outgoing_id}/raw", {
    params: { path: outgoingPath },
    parseAs: "arrayBuffer",
  });
  check(sentCopy.data, `sent copy: ${sentCopy.response.status}`);
  const sentText = Buffer.from(sentCopy.data).toString("latin1");
  check(sentText.includes(delivered.message_id), "sent copy: has the Message-ID");
  check(
    sentCopy.response.headers.get("Content-Type")?.startsWith("message/rfc822"),
    "sent copy: served as message/rfc822",
  );

  // A typed 409 again: a sent message cannot be cancelled.
  const cancel = await client.DELETE("/v1/accounts/{account_id}/outbox/{outgoing_id}", {
    params: { path: outgoingPath },
  });
  check(cancel.error, "cancel after sent: an error");
  check(cancel.response.status === 409, `cancel after sent: ${cancel.response.status}`);
  check(cancel.error.code === "not_cancellable", `cancel after sent: ${cancel.error.code}`);

  // 6. Retrieve the POP3 mailbox and wait for the retrieval to finish.
  const started = await client.POST("/v1/accounts/{account_id}/retrievals", { params: { path } });
  check(started.response.status === 202 && started.data, `retrieve: ${started.response.status}`);
  const retrievalPath = { ...path, retrieval_id: started.data.id };
  const done = await until(
    async () => {
      const got = await client.GET("/v1/accounts/{account_id}/retrievals/{retrieval_id}", {
        params: { path: retrievalPath },
      });
      check(got.data, `poll retrieval: ${JSON.stringify(got.error)}`);
      return got.data;
    },
    (retrieval) => retrieval.status === "succeeded" || retrieval.status === "failed",
  );
  check(done.status === "succeeded", `retrieval: ${JSON.stringify(done)}`);
  check(done.messages_downloaded === setup.mailbox_count, `retrieval: ${JSON.stringify(done)}`);

  // 7. Page through the stored messages.
  const seen: Schema<"MessageSummary">[] = [];
  let cursor: string | null = null;
  let pages = 0;
  do {
    const query: { limit: number; cursor?: string } =
      cursor === null ? { limit: PAGE_SIZE } : { limit: PAGE_SIZE, cursor };
    const page = await client.GET("/v1/accounts/{account_id}/messages", {
      params: { path, query },
    });
    check(page.data, `page: ${JSON.stringify(page.error)}`);
    check(page.data.items.length <= PAGE_SIZE, "page: at most limit items");
    seen.push(...page.data.items);
    cursor = page.data.next_cursor ?? null;
    pages += 1;
  } while (cursor !== null);
  check(seen.length === setup.mailbox_count, `paging: ${seen.length} messages`);
  check(new Set(seen.map((m) => m.id)).size === seen.length, "paging: no message twice");
  check(pages === Math.ceil(setup.mailbox_count / PAGE_SIZE), `paging: ${pages} pages`);

  // 8. The message with attachments, parsed.
  const expected = setup.with_attachments;
  const summary = seen.find((m) => m.subject === expected.subject);
  check(summary?.has_attachments, "the message with attachments is listed as such");
  const messagePath = { ...path, message_id: summary.id };
  const parsed = await client.GET("/v1/accounts/{account_id}/messages/{message_id}", {
    params: { path: messagePath },
  });
  check(parsed.data, `parsed: ${JSON.stringify(parsed.error)}`);
  const detail: Schema<"MessageDetail"> = parsed.data;
  check(detail.subject === expected.subject, "parsed: subject");
  check(detail.text?.content.includes("See attached."), "parsed: text body");
  check(detail.attachments.length === expected.attachments.length, "parsed: attachment list");

  // 9. The exact bytes retrieved.
  const raw = await client.GET("/v1/accounts/{account_id}/messages/{message_id}/raw", {
    params: { path: messagePath },
    parseAs: "arrayBuffer",
  });
  check(raw.data, `raw: ${raw.response.status}`);
  check(sha256(raw.data) === expected.raw_sha256, "raw: the exact bytes retrieved");
  check(
    raw.response.headers.get("Content-Type")?.startsWith("message/rfc822"),
    "raw: served as message/rfc822",
  );

  // 10. Each attachment's bytes, with its own content type.
  for (const [index, want] of expected.attachments.entries()) {
    const listed = detail.attachments.find((a) => a.index === index);
    check(listed?.filename === want.filename, `attachment ${index}: listed`);
    check(listed.content_type === want.content_type, `attachment ${index}: content type`);
    const got = await client.GET(
      "/v1/accounts/{account_id}/messages/{message_id}/attachments/{index}",
      { params: { path: { ...messagePath, index } }, parseAs: "arrayBuffer" },
    );
    check(got.data, `attachment ${index}: ${got.response.status}`);
    check(sameBytes(got.data, want.content_base64), `attachment ${index}: bytes`);
    check(listed.size === got.data.byteLength, `attachment ${index}: size`);
    check(
      got.response.headers.get("Content-Type")?.startsWith(want.content_type),
      `attachment ${index}: served as ${want.content_type}`,
    );
    check(
      got.response.headers.get("Content-Disposition")?.includes(want.filename),
      `attachment ${index}: Content-Disposition names the file`,
    );
  }

  // 11. Typed problems: 404 and 422, switched on their `code`.
  const missing = await client.GET("/v1/accounts/{account_id}", {
    params: { path: { account_id: "acc_missing" } },
  });
  check(missing.error, "missing account: an error");
  check(missing.response.status === 404, `missing account: ${missing.response.status}`);
  check(missing.error.code === "not_found", `missing account: ${missing.error.code}`);

  const invalid = await client.PATCH("/v1/accounts/{account_id}", {
    params: { path },
    body: { incoming: { port: 70000 } },
  });
  check(invalid.error, "invalid patch: an error");
  check(invalid.response.status === 422, `invalid patch: ${invalid.response.status}`);
  check(invalid.error.code === "validation_error", `invalid patch: ${invalid.error.code}`);
  check(
    invalid.error.errors?.some((e) => e.field.includes("port")),
    `invalid patch: ${JSON.stringify(invalid.error.errors)}`,
  );

  const report = {
    account_id: account.id,
    sent_message_id: delivered.message_id,
    sent_attachment_base64: attachment.toString("base64"),
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((error: unknown) => {
  const text = error instanceof Error ? (error.stack ?? error.message) : String(error);
  process.stderr.write(`${text}\n`);
  process.exit(1);
});
