// Write Qflow steps in JavaScript as a plain object over plain values.
//
//   import { StepError, log } from "./qflow-sdk.js";
//
//   export const step = {
//     description: "Upper-cases its input",
//     init(config) { return { suffix: config.suffix ?? "" }; },   // optional: once per instance
//     run(input, config, state) {
//       if (typeof input !== "string") throw new StepError("the input must be text", { code: "bad-input" });
//       log(`shouting ${input.length} characters`);
//       return input.toUpperCase() + state.suffix;
//     },
//   };
//
// The SDK does the contract's plumbing: the config ({} when the flow gives
// none) and the input arrive parsed from JSON, the output is written back
// as JSON, and anything thrown becomes a step error carrying its message
// (a StepError sets the code and whether a retry may help). `qflow build`
// writes this file beside the project's `app.js` on every build (so it is
// always the SDK of the qflow that builds) and componentizes the project
// with componentize-js against the contract's WIT.

import { log as hostLog, asset as hostAsset } from "qflow:plugin/host@0.2.0";
import { query as sqlQuery, execute as sqlExecute } from "qflow:plugin/sql@0.2.0";

/** A failure with a code (such as "bad-input") and a message; `retryable`
 * when running the same call again may succeed. */
export class StepError extends Error {
  constructor(message, { code = "error", retryable = false } = {}) {
    super(message);
    this.name = "StepError";
    this.code = code;
    this.retryable = retryable;
  }
}

const LEVELS = new Set(["trace", "debug", "info", "warn", "error"]);

/** Writes a line to the run's log, attributed to the calling step. */
export function log(message, level = "info") {
  hostLog(LEVELS.has(level) ? level : "info", String(message));
}

// What an import's `result` error arrives as: the payload, or an error
// object carrying it.
function payload(e) {
  return e !== null && typeof e === "object" && "payload" in e ? e.payload : e;
}

/** The bytes of the asset `loader-id/name`, as a Uint8Array. */
export function asset(name) {
  try {
    return hostAsset(name);
  } catch (e) {
    const p = payload(e);
    throw new StepError(p.message ?? String(p), { code: p.code ?? "asset", retryable: !!p.retryable });
  }
}

function value(v) {
  if (v === null || v === undefined) return { tag: "null" };
  if (typeof v === "boolean") return { tag: "boolean", val: v };
  if (typeof v === "bigint") {
    if (v < -(2n ** 63n) || v >= 2n ** 63n) {
      throw new StepError(`the integer ${v} does not fit a SQL parameter (64 bits); pass it as text`, { code: "bad-input" });
    }
    return { tag: "integer", val: v };
  }
  // An integer beyond 2^53 is not exact as a number: it goes as a real.
  if (typeof v === "number") return Number.isSafeInteger(v) ? { tag: "integer", val: BigInt(v) } : { tag: "real", val: v };
  if (v instanceof Uint8Array) return { tag: "blob", val: v };
  if (typeof v === "string") return { tag: "text", val: v };
  return { tag: "text", val: JSON.stringify(v) };
}

function sqlError(e) {
  const p = payload(e);
  const kind = p.kind ?? "other";
  return new StepError(p.message ?? String(p), {
    code: `sql-${kind}`,
    retryable: kind === "timeout" || kind === "unavailable",
  });
}

/** The databases granted to the step (`databases = [...]` in the flow).
 * Parameters ($1, $2, …) are bound by the database, never spliced in. */
export const sql = {
  /** The rows, as an array of objects keyed by column name. */
  query(db, statement, ...params) {
    try {
      return JSON.parse(sqlQuery(db, statement, params.map(value)));
    } catch (e) {
      throw e instanceof SyntaxError ? e : sqlError(e);
    }
  },
  /** How many rows the statement changed. */
  execute(db, statement, ...params) {
    try {
      return Number(sqlExecute(db, statement, params.map(value)));
    } catch (e) {
      throw sqlError(e);
    }
  },
};

function failure(e, code) {
  if (e instanceof StepError) return { code: e.code, message: e.message, retryable: e.retryable };
  if (e instanceof Error) {
    if (e.stack) hostLog("debug", e.stack);
    return { code, message: `${e.name}: ${e.message}`, retryable: false };
  }
  return { code, message: String(e), retryable: false };
}

/** What a step's `init` or `run` returned, refused if it is a Promise: the
 * call must finish before it returns (componentize-js does not wait for
 * promises), so a step cannot `await`, nor use `fetch`. */
function settled(value, what) {
  if (value !== null && typeof value === "object" && typeof value.then === "function") {
    throw new StepError(
      `${what} returned a Promise: a step's ${what} must finish before it returns (no async, no await, no fetch)`,
      { code: "async-unsupported" },
    );
  }
  return value;
}

/** The `step` world's exports over a step object (`run`, and optionally
 * `init`, `name`, `version`, `description`, `assets`, `needs`). */
export function world(step, project) {
  let instance = null;
  return {
    describe() {
      return {
        name: step.name ?? project,
        version: step.version ?? "0.1.0",
        description: step.description ?? "",
        kind: "step",
        assets: step.assets ?? [],
        needs: step.needs ?? [],
      };
    },
    init(config) {
      try {
        const parsed = config ? JSON.parse(config) : {};
        instance = { config: parsed, state: step.init ? settled(step.init(parsed), "init") : undefined };
      } catch (e) {
        throw failure(e, "bad-config");
      }
    },
    run(input) {
      try {
        if (instance === null) throw new StepError("run before init: the host always calls init first", { code: "no-init" });
        const output = settled(step.run(JSON.parse(input), instance.config, instance.state), "run");
        const text = JSON.stringify(output ?? null);
        if (text === undefined) throw new StepError(`run returned a ${typeof output}, which has no JSON form`, { code: "bad-output" });
        return text;
      } catch (e) {
        throw failure(e, "error");
      }
    },
  };
}
