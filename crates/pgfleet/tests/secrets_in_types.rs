//! Every public type that can hold a password, formatted with `Debug` and
//! (where it has one) `Display`, never shows it. No server needed: the pools
//! here point at a closed port and never connect.

use std::time::Duration;

use pgfleet::{Fleet, Loaded, Loader, Pool, PoolConfig, PoolSettings, RawValue, Source, Target};

const SECRET: &str = "Walrus-Umber-5512";

fn url() -> String {
    format!("postgres://app:{SECRET}@127.0.0.1:1/db?application_name=svc")
}

fn assert_hidden(what: &str, shown: &str) {
    assert!(
        !shown.contains(SECRET),
        "{what} shows the password: {shown}"
    );
}

#[test]
fn no_type_that_holds_a_password_shows_it() {
    let target = Target::parse(&url()).unwrap();
    let mut settings = PoolSettings::new();
    settings
        .set("url", &RawValue::Str(url()), Source::Code)
        .unwrap();
    settings
        .set("password", &RawValue::Str(SECRET.into()), Source::Code)
        .unwrap();
    let env = [
        ("POSTGRES_PASSWORD", SECRET.to_owned()),
        ("DATABASE_URL", url()),
    ];
    let loader = Loader::without_files().env(env.clone());
    let loaded: Loaded = loader.load().unwrap();
    // An application's own key whose values were interpolated from the
    // environment holds the secret too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "connection_pool:\n  service_secrets:\n    - password: ${POSTGRES_PASSWORD}\n      url: ${DATABASE_URL}\n",
    )
    .unwrap();
    let with_app = Loader::new(dir.path())
        .application_key("service_secrets")
        .env(env.clone())
        .load()
        .unwrap();
    let app_value = with_app.application_value("service_secrets").unwrap();
    assert!(
        format!("{:?}", app_value.value).contains(SECRET),
        "the value is there to read"
    );
    let bad_url = Target::parse(&format!("postgres://app:{SECRET}@h:x/db")).unwrap_err();
    let bad_setting = PoolSettings::new()
        .set("password", &RawValue::List(vec![]), Source::Code)
        .unwrap_err();
    let shown: Vec<(&str, String)> = vec![
        ("Target Display", target.to_string()),
        ("Target Debug", format!("{target:?}")),
        ("Target::key", target.key().to_owned()),
        ("Target::masked_url", target.masked_url()),
        ("PoolSettings Debug", format!("{settings:?}")),
        (
            "PoolSettings::explain",
            format!("{:?}", settings.explain().unwrap()),
        ),
        ("Loader Debug", format!("{loader:?}")),
        ("Loaded Debug", format!("{loaded:?}")),
        ("Loaded::explain", format!("{:?}", loaded.explain())),
        ("Loaded::settings", format!("{:?}", loaded.settings())),
        ("Loaded with an application key", format!("{with_app:?}")),
        ("ApplicationValue Debug", format!("{app_value:?}")),
        ("config Error Display", bad_url.to_string()),
        ("config Error Debug", format!("{bad_url:?}")),
        ("setting Error Display", bad_setting.to_string()),
        ("setting Error Debug", format!("{bad_setting:?}")),
    ];
    for (what, text) in &shown {
        assert_hidden(what, text);
    }
    assert!(format!("{settings:?}").contains("***"));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = PoolConfig {
            min_size: 0,
            acquire_timeout: Duration::from_millis(50),
            ..PoolConfig::default()
        };
        let fleet = Fleet::new();
        let handle = fleet.pool(&target, &config).unwrap();
        let pool = Pool::new(target.clone(), config.clone()).unwrap();
        let acquire = handle.get().await.unwrap_err();
        let warmup = fleet
            .warmup([(
                target.clone(),
                PoolConfig {
                    min_size: 1,
                    ..config
                },
            )])
            .await;
        let shown: Vec<(&str, String)> = vec![
            ("Fleet Debug", format!("{fleet:?}")),
            ("PoolHandle Debug", format!("{handle:?}")),
            ("Pool Debug", format!("{pool:?}")),
            ("FleetStats Debug", format!("{:?}", fleet.stats())),
            ("PoolStats Debug", format!("{:?}", handle.stats())),
            ("acquire Error Display", acquire.to_string()),
            ("acquire Error Debug", format!("{acquire:?}")),
            ("acquire Error report", pgfleet::report(&acquire)),
            ("WarmupReport Debug", format!("{warmup:?}")),
            ("Loaded::warmup", format!("{:?}", loaded.warmup())),
        ];
        for (what, text) in &shown {
            assert_hidden(what, text);
        }
        fleet.close_all(Duration::from_secs(1)).await;
        pool.close();
    });
}
