// Pure functions over the API's `model_logprobs` entries (docs/playground.md): colours, probabilities and the
// summary the paper's analysis reports (how often the top token changes, which tokens move most).

// |shift| (in nats) at which a token's colour is at full strength: e^4 ~ 55 times likelier or less likely.
export const FULL_SHIFT = 4;

export function probability(logprob) {
  return Math.exp(logprob);
}

export function percent(logprob) {
  const p = probability(logprob) * 100;
  return p >= 10 ? `${p.toFixed(0)}%` : p >= 0.1 ? `${p.toFixed(1)}%` : "<0.1%";
}

// A token's background: green where the tuning raised its log-probability, orange where it lowered it.
export function shiftColour(shift) {
  const strength = Math.min(Math.abs(shift) / FULL_SHIFT, 1);
  const alpha = (0.08 + 0.72 * strength).toFixed(3);
  return shift >= 0 ? `rgba(30, 150, 80, ${alpha})` : `rgba(225, 105, 30, ${alpha})`;
}

export function topToken(entry, role) {
  const model = entry.models[role];
  return model && model.top_logprobs.length ? model.top_logprobs[0].token_id : undefined;
}

// The distributions of an entry in display order: base, then each expert and its anti-expert, then the proxy.
export function roles(entry) {
  const names = Object.keys(entry.models);
  const middle = names.filter((r) => r !== "base" && r !== "proxy");
  return ["base", ...middle, "proxy"].filter((r) => r in entry.models);
}

// What the paper measures: the share of steps where the proxy's top-1 differs from the base's, where those
// steps are, and the tokens the tuning moved most (by |proxy logprob - base logprob|).
export function summarize(entries, count = 5) {
  const changed = [];
  entries.forEach((entry, position) => {
    const base = topToken(entry, "base");
    const proxy = topToken(entry, "proxy");
    if (base !== undefined && proxy !== undefined && base !== proxy) changed.push(position);
  });
  const mostShifted = entries
    .map((entry, position) => ({ position, token: entry.token, shift: entry.shift }))
    .sort((a, b) => Math.abs(b.shift) - Math.abs(a.shift))
    .slice(0, count);
  return {
    tokens: entries.length,
    changed,
    share: entries.length ? changed.length / entries.length : 0,
    mostShifted,
  };
}

// A token's text as shown: whitespace made visible where it would vanish.
export function visible(text) {
  if (text === "") return "∅";
  return text.replace(/\n/g, "↵\n").replace(/\t/g, "⇥");
}
