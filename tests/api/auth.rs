//! API keys, on a server of their own started with two keys: every route but the playground,
//! `/health` and `/metrics` answers 401 in the OpenAI shape without one of them, and as usual with either.

use serde_json::json;

use crate::cases;
use crate::server::Server;

pub fn cases() -> Vec<(&'static str, crate::OwnCase)> {
    cases![own: routes_need_one_of_the_keys]
}

async fn routes_need_one_of_the_keys() {
    let server = Server::ready(&["--api-key", "sk-first", "--api-key", "sk-second"]).await;
    let c = server.client();
    let hi = json!({"prompt": "Hi", "max_tokens": 2});
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    // The checking client sends no key: each reply is a 401 the spec describes.
    for reply in [
        c.post("/v1/completions", &hi).await,
        c.post("/v1/chat/completions", &chat).await,
        c.get("/v1/models").await,
        c.get("/v1/rewards").await,
        c.post("/tokenize", &json!({"prompt": "Hi"})).await,
        c.post("/detokenize", &json!({"tokens": [1]})).await,
    ] {
        assert_eq!(reply.status, 401, "{:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], "invalid_api_key");
        assert_eq!(reply.body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(c.get("/health").await.status, 200);
    assert_eq!(c.get("/metrics").await.status, 200);
    // The page is public; the API calls it makes carry the key the user types into it.
    assert_eq!(c.get("/").await.status, 200);
    let send = |key: &'static str| {
        let request = c
            .http
            .post(c.url("/v1/completions"))
            .bearer_auth(key)
            .json(&hi);
        c.send("POST", "/v1/completions", request)
    };
    let wrong = send("sk-third").await;
    assert_eq!(wrong.status, 401);
    // The key given is never echoed.
    assert!(
        !wrong.body.to_string().contains("sk-third"),
        "{:?}",
        wrong.body
    );
    assert_eq!(send("sk-first").await.status, 200);
    assert_eq!(send("sk-second").await.status, 200);
    let raw = (c.http.get(c.url("/v1/models")).send()).await.unwrap();
    assert_eq!(raw.headers()["www-authenticate"], "Bearer");
}
