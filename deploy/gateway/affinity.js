// The affinity key of a request: the first adapter it names, or "" for the base model.
//
// The key is read the way service/api/adapter_sets.py reads the set, so every request that names an adapter
// first lands on the replica whose cache already holds it:
//   ?adapter=boolq@3                     -> boolq   (a pinned version goes with its name)
//   ?adapters=boolq:0.6,piqa:0.4         -> boolq   (the first item of a weighted set)
//   {"model": "boolq:0.6+piqa:0.4[ties]"} -> boolq  (/v1/completions, /v1/chat/completions)
//   {"adapters": [{"name": "boolq"}]}    -> boolq   (/generate's body)
//   {"model": "base"}, nothing, or anything unreadable -> ""  (spread by least connections)
// The model's own label (a path or hub id, "/" included) is no adapter name either, so it spreads too.
// The server still checks everything: a wrong name only picks a replica, which then answers 404 or 422.

const NAME = /^[a-z0-9][a-z0-9._-]{0,63}$/;  // service/validation.py's NAME_RE
const BASE = "base";

function nameOf(item) {
    // "boolq@3:0.6" -> "boolq"; not a possible adapter name -> "".
    const name = item.split(":")[0].split("@")[0].trim();
    return NAME.test(name) && name !== BASE ? name : "";
}

function firstName(spec, separator) {
    const items = spec.split(separator).filter((item) => item.trim().length > 0);
    return items.length > 0 ? nameOf(items[0]) : "";
}

function queryValue(value) {
    // A repeated query parameter comes as an array; the server reads the last one.
    return Array.isArray(value) ? value[value.length - 1] : value;
}

function bodyKey(r) {
    let body;
    try {
        // undefined without a body; throws when nginx spooled a large body to a file.
        const text = r.requestText;
        if (!text) {
            return "";
        }
        body = JSON.parse(text);
    } catch (e) {
        return "";
    }
    if (body === null || typeof body !== "object") {
        return "";
    }
    if (typeof body.model === "string") {
        return firstName(body.model.replace(/\[[a-z]+\]\s*$/, ""), "+");
    }
    if (Array.isArray(body.adapters) && body.adapters.length > 0 && body.adapters[0]
            && typeof body.adapters[0].name === "string") {
        return nameOf(body.adapters[0].name);
    }
    return "";
}

// js_set $shira_adapter: read by the map that picks the upstream and by the affinity upstream's hash.
function adapterKey(r) {
    const adapter = queryValue(r.args.adapter);
    if (adapter !== undefined) {
        return firstName(adapter, ",");
    }
    const adapters = queryValue(r.args.adapters);
    if (adapters !== undefined) {
        return firstName(adapters, ",");
    }
    return bodyKey(r);
}

// js_content of the generation locations: njs reads the whole body before it calls this, so after the
// redirect the upstream (chosen by proxy_pass from $shira_pool) is picked from a key that can see the body.
function route(r) {
    r.internalRedirect("@generation");
}

export default { adapterKey, route };
