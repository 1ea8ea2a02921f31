//! The operator's copies of workloads in member clusters: finding and
//! deleting them, for the workload reconciler (its own copies) and the data
//! center reconciler (copies left behind while a member was down).

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::{Client, ResourceExt as _};

use super::children;
use super::{Context, Error};

/// A copy the operator made in a member cluster.
#[derive(Debug, Clone)]
pub(super) struct ChildRef {
    pub(super) kind: &'static str,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) workload_namespace: String,
    pub(super) workload_name: String,
}

/// The copies of workload `namespace/name` in `data_center`'s member: from
/// the member's watches when they have listed everything, else asked of
/// the member.
pub(super) async fn copies_of(
    ctx: &Context,
    member: &Client,
    data_center: &str,
    namespace: &str,
    name: &str,
) -> Result<Vec<ChildRef>, Error> {
    match ctx.members.kinds_present(data_center, namespace, name) {
        Some(kinds) => Ok(kinds
            .into_iter()
            .map(|kind| ChildRef {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                workload_namespace: namespace.to_owned(),
                workload_name: name.to_owned(),
            })
            .collect()),
        None => list_children(member, data_center, Some((namespace, name))).await,
    }
}

/// The operator's copies in `data_center`'s member, optionally of one
/// workload only.
pub(super) async fn list_children(
    member: &Client,
    data_center: &str,
    workload: Option<(&str, &str)>,
) -> Result<Vec<ChildRef>, Error> {
    let mut selector = format!(
        "{},{}={data_center}",
        children::managed_selector(),
        children::DATA_CENTER
    );
    if let Some((namespace, name)) = workload {
        selector = format!(
            "{selector},{}={namespace},{}={name}",
            children::WORKLOAD_NAMESPACE,
            children::WORKLOAD_NAME
        );
    }
    let params = ListParams::default().labels(&selector);
    let failed = |source| Error::Member {
        data_center: data_center.to_owned(),
        source,
    };
    let mut found = Vec::new();
    let mut push =
        |kind: &'static str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            let labels = meta.labels.clone().unwrap_or_default();
            let (namespace, name) = (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            // A copy is named as its workload; an object whose labels name
            // another is not the operator's, whatever its labels say.
            if labels.get(children::WORKLOAD_NAMESPACE) != Some(&namespace)
                || labels.get(children::WORKLOAD_NAME) != Some(&name)
            {
                return;
            }
            found.push(ChildRef {
                kind,
                workload_namespace: namespace.clone(),
                workload_name: name.clone(),
                namespace,
                name,
            });
        };
    for d in Api::<Deployment>::all(member.clone())
        .list_metadata(&params)
        .await
        .map_err(failed)?
    {
        push("Deployment", &d.metadata);
    }
    for s in Api::<StatefulSet>::all(member.clone())
        .list_metadata(&params)
        .await
        .map_err(failed)?
    {
        push("StatefulSet", &s.metadata);
    }
    for j in Api::<Job>::all(member.clone())
        .list_metadata(&params)
        .await
        .map_err(failed)?
    {
        push("Job", &j.metadata);
    }
    Ok(found)
}

/// Deletes one copy (and, in the background, its pods), if it is still
/// `data_center`'s: in a member cluster that data centers share, the
/// object under the workload's name may have become another's (the
/// workload moved to it, and applying its copy relabelled the object).
pub(super) async fn delete_child(
    ctx: &Context,
    member: &Client,
    data_center: &str,
    child: &ChildRef,
) -> Result<(), Error> {
    ctx.members.forget_copy(&(
        data_center.to_owned(),
        child.workload_namespace.clone(),
        child.workload_name.clone(),
    ));
    let result = match child.kind {
        "Deployment" => {
            delete_if_of(
                Api::<Deployment>::namespaced(member.clone(), &child.namespace),
                &child.name,
                data_center,
            )
            .await
        }
        "StatefulSet" => {
            delete_if_of(
                Api::<StatefulSet>::namespaced(member.clone(), &child.namespace),
                &child.name,
                data_center,
            )
            .await
        }
        _ => {
            delete_if_of(
                Api::<Job>::namespaced(member.clone(), &child.namespace),
                &child.name,
                data_center,
            )
            .await
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Member {
            data_center: data_center.to_owned(),
            source,
        }),
    }
}

/// Deletes `name` if its data-center label still names `data_center`, on
/// the condition that it is the object just read (its uid: a status write
/// in between must not fail the delete; a relabelling in the moment
/// between the read and the delete is not covered).
async fn delete_if_of<K>(api: Api<K>, name: &str, data_center: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = api.get_opt(name).await? else {
        return Ok(());
    };
    if object
        .labels()
        .get(children::DATA_CENTER)
        .map(String::as_str)
        != Some(data_center)
    {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: object.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    api.delete(name, &params).await.map(|_| ())
}
